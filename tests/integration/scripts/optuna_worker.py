"""One Optuna worker process: ``python optuna_worker.py STORAGE STUDY N_TRIALS WORKER``.

Runs exactly N_TRIALS trials of a small objective on the shared RDB study (the caller splits the
requested total between workers, so no trial is lost or duplicated). Each trial records which
process ran it.
"""

import os
import sys
import time

import optuna


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    y = trial.suggest_int("y", 0, 5)
    trial.set_user_attr("pid", os.getpid())
    time.sleep(0.2)  # long enough for the two workers' trials to interleave
    return (x - 2.0) ** 2 + y


def main() -> None:
    storage, study_name, n_trials, worker = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.TPESampler(seed=worker))
    study.optimize(objective, n_trials=n_trials)


if __name__ == "__main__":
    main()
