# The two commands of the README.
.PHONY: serve test

# Run the node on its embedded default: SQLite, local storage, the shipped reference model.
serve:
	scripts/setup.sh
	.venv/bin/osteo-node serve --config config.example.toml

# Run the full test suite (installs the Debian test tools first when run as root).
test:
	scripts/setup.sh --system
	.venv/bin/python -m pytest -ra
