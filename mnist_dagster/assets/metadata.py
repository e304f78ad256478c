"""Metadata helpers shared by the assets: Dagster has no image type, so PNGs go inline in Markdown."""

from __future__ import annotations

import base64

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MarkdownMetadataValue:
    """A small PNG embedded as a data URI; the asset page renders it as an image."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def table(rows: list[dict], columns: list[str]) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({column: row[column] for column in columns}) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(column) for column in columns]),
    )
