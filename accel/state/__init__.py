"""The one in-memory state model: typed records (model.py), parsing at the edge (parse.py),
identities (identity.py) and the store that applies events and notifies subscribers (store.py)."""
