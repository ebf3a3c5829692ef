"""One module per tab of the main window: Preprocess, Train, Predict, Evaluate."""
