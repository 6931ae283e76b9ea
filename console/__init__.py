"""quantdeck's console: the `quantdeck` CLI and the Textual app. Importing it never imports torch."""
