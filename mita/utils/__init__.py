"""Utilities: FLOP and parameter counting (``mita.utils.flops``)."""
from .flops import count_flops, count_params, flops_table, format_flops_table

__all__ = ["count_flops", "count_params", "flops_table", "format_flops_table"]
