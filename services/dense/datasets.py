"""The offline data sets the default dense models train and are evaluated on."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# Digits pixels run 0..16; exported graphs divide by this, so clients send raw pixels.
PIXEL_MAX = 16.0
SINE_WINDOW = 24


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed 80/20 stratified split of scikit-learn's 8x8 digits: x_train, x_test, y_train, y_test."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def sine_series(length: int = 3000, seed: int = 0) -> np.ndarray:
    """Two seasonal sine waves (periods 24 and 7) plus noise: a series with learnable structure."""
    t = np.arange(length, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, 0.05, length).astype(np.float32)
    return np.sin(2 * np.pi * t / 24) + 0.5 * np.sin(2 * np.pi * t / 7) + noise


def sine_windows(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows of 24 steps and the next value, split in time: the last 20% is held out."""
    series = sine_series(seed=seed)
    windows = np.lib.stride_tricks.sliding_window_view(series[:-1], SINE_WINDOW)
    x = windows[..., None].astype(np.float32)  # [N, 24, 1]
    y = series[SINE_WINDOW:, None].astype(np.float32)  # [N, 1]
    cut = int(len(x) * 0.8)
    return x[:cut], x[cut:], y[:cut], y[cut:]


def held_out(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) of a named data set's held-out split."""
    if dataset == "sklearn.digits":
        _, x_test, _, y_test = digits_split()
        return x_test, y_test
    if dataset == "sklearn.digits.images":
        _, x_test, _, y_test = digits_split()
        return x_test.reshape(-1, 1, 8, 8), y_test
    if dataset == "generated.sine":
        _, x_test, _, y_test = sine_windows()
        return x_test, y_test
    raise ValueError(f"unknown data set {dataset!r}")
