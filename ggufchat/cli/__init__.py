"""The `ggufchat` command line: one module per verb, one error table in main."""
