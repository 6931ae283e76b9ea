"""One module per subcommand (or group of close ones). Each exports COMMANDS: a tuple of click commands.

Command modules import engine/remote lazily inside the command body, so `quantdeck --help` and
`import console` stay free of torch.
"""
