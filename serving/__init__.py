"""FastAPI predictor: online features, adaptive batching, models, prediction log (issue 5)."""
