"""Put on PYTHONPATH of a pipeline subprocess: a fine-tuning run's loss becomes NaN at optimizer
step ``$SELFATTN_TEST_NAN_STEP`` (the in-process tests monkeypatch the same seam)."""

import os

_step = int(os.environ.get("SELFATTN_TEST_NAN_STEP", "0"))
if _step:
    from selfattn.train import engine

    _clean = engine._Run._micro_loss

    def _poisoned(self, batch):
        loss = _clean(self, batch)
        if self.task.kind == "classifier" and self.state.step + 1 == _step:
            return loss * float("nan")
        return loss

    engine._Run._micro_loss = _poisoned
