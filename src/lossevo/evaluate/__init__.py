"""Evaluation of trained losses: statistics (Welch t-tests); later FGSM and accuracy basins."""
