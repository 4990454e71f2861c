"""The tuner: search space, trials run as processes, the Optuna study and the recipe it picks; never imports torch."""
