"""One module per `cairl` subcommand."""
