"""Paper table: self-repair breakdown per head (named query table_head_breakdown)."""

from selfrepair.analysis.spec import TableSpec, headline_params

TABLE = TableSpec(
    name="table_head_breakdown",
    title="Self-repair breakdown per head",
    query="table_head_breakdown",
    runs=lambda ctx: [headline_params(ctx)],
)
