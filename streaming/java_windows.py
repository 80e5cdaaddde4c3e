"""Window assembly in the JVM (streaming/java/sluice/WindowAssembler.java): the view's plan.

The Java window code reads a view as JSON: its slide, its window sizes in the order of the
view's windows, one slot per partial state (the aggregation and the type of the column it reads:
the tile row's state columns, streaming/tiles.py), and one spec per feature (its name, slot and
window size), as streaming/compile.CompiledView holds them.
"""

from __future__ import annotations

import orjson

from streaming.compile import CompiledView


def window_plan(compiled: CompiledView) -> str:
    """The view's plan as WindowAssembler reads it."""
    types = compiled.view.column_types()
    slots = [
        {
            "function": str(function),
            "type": None if index is None else str(types[compiled.columns[index]]),
        }
        for index, function in compiled.slots
    ]
    specs = [{"name": s.name, "slot": s.slot, "window": s.window_ms} for s in compiled.specs]
    plan = {
        "view": compiled.name,
        "slide": compiled.slide_ms,
        "sizes": list(compiled.window_sizes_ms),
        "slots": slots,
        "specs": specs,
    }
    return orjson.dumps(plan).decode()
