"""Shared fixtures of the project's own tests (the Airflow/emulator ones come from our plugin)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import pytest

# The example DAGs' sensors take their default from [operators] default_deferrable, read when
# Airflow is first imported: set it before anything imports Airflow.
os.environ.setdefault("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")

from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: E402

PG_URL = os.environ.get("FABLE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Paint(BaseModel):
    """A small output model with an enum, a bool, a bounded string and a cross-field invariant."""

    model_config = ConfigDict(extra="forbid")

    color: Color
    glossy: bool
    coats: int = Field(ge=1, le=5)
    note: str = Field(max_length=80)

    @model_validator(mode="after")
    def _glossy_needs_two_coats(self) -> Paint:
        if self.glossy and self.coats < 2:
            raise ValueError("glossy paint needs at least 2 coats")
        return self


@pytest.fixture
def sqlite_engine(tmp_path):
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'dest.db'}")
    yield engine
    engine.dispose()


def require_pg(engine: Any) -> None:
    """Skip the test when no PostgreSQL answers on ``engine`` (fail instead under CI=true)."""
    import sqlalchemy as sa

    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "no server here"
        engine.dispose()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL must be reachable in CI at {PG_URL}: {exc}")
        pytest.skip(f"no PostgreSQL server answers at {PG_URL} ({type(exc).__name__})")


@contextmanager
def private_pg_database(prefix: str) -> Iterator[Any]:
    """A throwaway database on the local PostgreSQL (its URL), dropped WITH FORCE on exit.

    Shared by the tests that need a whole database rather than a schema: Airflow's metadata DB
    of the real-deployment tests, and a ledger reached through an Airflow connection.
    """
    import sqlalchemy as sa

    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    require_pg(admin)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield sa.engine.make_url(PG_URL).set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def pg_engine() -> Iterator[object]:
    """A private schema on the local PostgreSQL; skipped (never under CI=true) when none answers."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    require_pg(engine)
    schema = f"fable_test_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    scoped = sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    yield scoped
    scoped.dispose()
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()
