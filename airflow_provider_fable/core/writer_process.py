"""The writer process of the SQLite load path: stores prepared chunks sent over a pipe.

Started by ``core.loading`` as ``python -m airflow_provider_fable.core.writer_process`` (a fresh
interpreter: not a fork of a threaded task process, and unlike multiprocessing's ``spawn`` it
does not re-run the caller's ``__main__``). Protocol, pickle frames: stdin carries a
``ResultSink`` then one ``StoreJob`` per chunk and ``None`` to finish; stdout answers each job
with ``("ok", [(row index, message), ...])`` or, once, ``("error", exception)``. When the
loading process dies its end of stdin closes and this process exits.
"""

from __future__ import annotations

import pickle
import sys


def main() -> None:
    source, answers = sys.stdin.buffer, sys.stdout.buffer
    sink = None
    try:
        sink = pickle.load(source)
        while True:
            try:
                job = pickle.load(source)
            except EOFError:
                return  # the loading process is gone
            if job is None:
                return
            pickle.dump(("ok", sink.store(job)), answers)
            answers.flush()
    except BaseException as exc:  # noqa: BLE001 - handed back to the loading process
        try:
            payload = pickle.dumps(("error", exc))
        except Exception:  # noqa: BLE001 - not every driver error pickles
            payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        try:
            answers.write(payload)
            answers.flush()
        except OSError:
            pass
    finally:
        if sink is not None:
            sink.engine.dispose()


if __name__ == "__main__":
    main()
