"""Paper table: self-repair breakdown per layer (named query table_layer_breakdown)."""

from selfrepair.analysis.spec import TableSpec, headline_params

TABLE = TableSpec(
    name="table_layer_breakdown",
    title="Self-repair breakdown per layer",
    query="table_layer_breakdown",
    runs=lambda ctx: [headline_params(ctx)],
)
