"""HEST-1k gene-expression regression: log1p targets, StandardScaler + PCA fitted on the training
folds, Ridge (alpha = 100 / (n_components x n_targets), no intercept, lsqr), Pearson r per target on
the pooled test rows of each fold, averaged over targets; mean ± std over folds."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from openpluto.eval.metrics import pearson_per_column


def ridge_fold(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_components: int = 256,
    alpha_numerator: float = 100.0,
    log1p: bool = True,
    seed: int = 0,
) -> dict:
    """One fold. x: features [N, D]; y: raw targets [N, T] (log1p applied here when ``log1p``).

    PCA keeps ``min(n_components, N_train, D)`` components; alpha uses that number, so with 256
    components it is exactly HEST's ``100 / (256 x T)``.
    """
    y_train = np.asarray(y_train, np.float64)
    y_test = np.asarray(y_test, np.float64)
    if log1p:
        y_train, y_test = np.log1p(y_train), np.log1p(y_test)
    scaler = StandardScaler().fit(x_train)
    k = int(min(n_components, x_train.shape[0], x_train.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(scaler.transform(x_train))
    z_train = pca.transform(scaler.transform(x_train))
    z_test = pca.transform(scaler.transform(x_test))
    alpha = alpha_numerator / (k * y_train.shape[1])
    ridge = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", random_state=seed, max_iter=1000)
    pred = ridge.fit(z_train, y_train).predict(z_test).reshape(len(z_test), -1)
    r = pearson_per_column(y_test, pred)
    return {
        "pearson_mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
        "pearson_per_target": [None if not np.isfinite(v) else float(v) for v in r],
        "n_components": k,
        "alpha": alpha,
        "n_train": int(len(x_train)),
        "n_test": int(len(x_test)),
    }
