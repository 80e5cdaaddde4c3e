"""The Feast repository: feature_store.yaml and the features/ -> Feast translation (issue 3)."""
