"""Metrics and plots for a trained model (scikit-learn, matplotlib)."""
