# The two commands of the README.
.PHONY: serve test

# Run the node on its embedded default: SQLite, local storage, the shipped reference model.
serve:
	scripts/setup.sh
	.venv/bin/osteo-node serve --config config.example.toml

# Run the full test suite (installs the Debian test tools first when run as root), one pytest-xdist
# worker per core (at most 4: each holds torch and its own nodes); the slowest tests wait on
# subprocesses, Orthanc and the browser, so two workers on two cores overlap those waits.
test:
	scripts/setup.sh --system
	.venv/bin/python -m pytest -ra -n auto --maxprocesses 4 --dist worksteal
