"""Apache Airflow provider for clearing large backlogs through Anthropic's Message Batches API.

Importing this package must stay cheap and must not import Airflow or the anthropic SDK: the
provider manager calls :func:`get_provider_info` at every CLI start, and the emulator and the
pure-Python core are used without Airflow at all.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: The connection id every operator, the sensor and the hook use when none is given (the hook
#: repeats it as ``FableHook.default_conn_name``; a test keeps the two equal). Defined here so an
#: operator module can default to it without importing the hook at DAG parse time.
DEFAULT_CONN_ID = "fable_default"

__all__ = ["DEFAULT_CONN_ID", "__version__", "get_provider_info"]


def get_provider_info() -> dict[str, Any]:
    """Describe the provider to Airflow's ProviderManager (entry point ``apache_airflow_provider``).

    ``package-name`` must equal the distribution name or Airflow ignores the provider. The
    connection form is declared here (``conn-fields`` / ``ui-field-behaviour``) because Airflow 3
    builds the UI form from provider metadata rather than importing hook classes.
    """
    return {
        "package-name": "airflow-provider-fable",
        "name": "Fable (Anthropic Message Batches)",
        "description": "Clear large backlogs cheaply through Anthropic's Message Batches API.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Anthropic Message Batches",
                "external-doc-url": "https://docs.anthropic.com/en/docs/build-with-claude/batch-processing",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Anthropic Message Batches",
                "python-modules": ["airflow_provider_fable.hooks.fable"],
            }
        ],
        "operators": [
            {
                "integration-name": "Anthropic Message Batches",
                "python-modules": [
                    "airflow_provider_fable.operators.submit",
                    "airflow_provider_fable.operators.batch",
                    "airflow_provider_fable.operators.load",
                ],
            }
        ],
        "extra-links": ["airflow_provider_fable.links.FableBatchLink"],
        # `airflow fable jobs|status|failed|review|estimate` (Airflow 3 asks providers for CLI commands).
        "cli": ["airflow_provider_fable.cli.get_fable_cli_commands"],
        # The "Backlogs" page: a FastAPI app on the API server plus a nav entry (Airflow 3.1+).
        "plugins": [
            {
                "name": "fable_backlogs",
                "plugin-class": "airflow_provider_fable.plugins.backlogs.FableBacklogsPlugin",
            }
        ],
        "sensors": [
            {
                "integration-name": "Anthropic Message Batches",
                "python-modules": ["airflow_provider_fable.sensors.batch"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Anthropic Message Batches",
                "python-modules": ["airflow_provider_fable.triggers.batch"],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_fable.hooks.fable.FableHook",
                "hook-name": "Fable (Anthropic Message Batches)",
                "connection-type": "fable",
                "conn-fields": {
                    "default_model": {
                        "label": "Default model",
                        "schema": {"type": ["string", "null"]},
                        "description": "Model used when an operator does not name one (default claude-fable-5).",
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 600},
                        "description": "Read timeout of one API call (connecting has its own limit).",
                    },
                    "connect_timeout": {
                        "label": "Connect timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 5},
                    },
                    "scheme": {
                        "label": "Scheme",
                        "schema": {"type": ["string", "null"], "enum": ["http", "https", None]},
                        "description": "For a base URL given without one (URI form); empty = https.",
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "default": 2},
                        "description": "SDK retries on 408/409/429/5xx and connection errors.",
                    },
                    "workspace_id": {
                        "label": "Workspace ID",
                        "schema": {"type": ["string", "null"]},
                        "description": "Only for credentials that can act on more than one workspace.",
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API key", "host": "Base URL"},
                    "placeholders": {
                        "host": "empty = https://api.anthropic.com (set http://127.0.0.1:8787 for the emulator)",
                        "password": "sk-ant-...",
                    },
                },
            }
        ],
    }
