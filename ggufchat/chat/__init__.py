"""The terminal chat over the engine facade."""
