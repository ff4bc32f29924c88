"""Stand-ins shared by tests that drive the ranking path without a trained model."""

from __future__ import annotations


class _Identity:
    def apply(self, probs):
        return probs


class PredictOnly:
    """A stand-in scorer defined by its ``predict(cols)``, seen through the stages ``services.ranking.score``
    calls: encoding hands the columns on, the forward pass is ``predict``, calibration is the identity."""

    calibration = _Identity()

    def encode(self, cols):
        return cols, None

    def score_codes(self, cols, _num):
        return self.predict(cols)
