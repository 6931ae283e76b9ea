"""One Screen or ModalScreen per module."""
