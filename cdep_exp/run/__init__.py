"""One run from its config to its record: composing it (`compose`), its directory (lock,
identity, archive), its identity (normalised config, hash, the `<data_dir>` codec), its record
(`RunRecord`, metrics.json) and the app that orders the steps (`app.run`).

`from cdep_exp.run import run` loads the app on first use, so reading records and identities
(`cdep_exp.run.record`, `cdep_exp.run.identity`) does not import the training stack.
"""


def __getattr__(name: str):
    if name == "run":
        from cdep_exp.run.app import run

        return run
    raise AttributeError(f"module 'cdep_exp.run' has no attribute {name!r}")
