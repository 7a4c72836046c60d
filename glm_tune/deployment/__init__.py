"""Deployment: the predictor template shared by predict and infer, the exported step graph and its engines."""
