"""The online service. Imports `model/` and `index/`; nothing imports it."""
