"""`ggufchat serve`: the HTTP server over the engine."""
