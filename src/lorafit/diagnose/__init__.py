"""Diagnostics: config checks, dataset audit, loss-curve diagnosis, recommender and memory estimator."""
