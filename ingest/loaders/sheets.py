"""Spreadsheets: .xlsx (openpyxl, read-only streaming) and .xls (xlrd).

One table Document per sheet (metadata sheet = name, page = 1-based sheet position); rows as `列名: 值 | ...`
(see base.py for why); cached formula results are read, not formulas.
"""
from __future__ import annotations

import zipfile

import openpyxl
import xlrd

from ingest.loaders.base import Ctx, LoadError
from ingest.loaders.office import check_encrypted_office


def load_xlsx(ctx: Ctx) -> None:
    check_encrypted_office(ctx, "Excel 表格")
    try:
        wb = openpyxl.load_workbook(str(ctx.path), read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise LoadError("corrupt", f"Excel 表格「{ctx.name}」无法打开（{e}）：请用 Excel 打开并另存为 .xlsx "
                                   "后重新导入") from e
    try:
        for number, ws in enumerate(wb.worksheets, start=1):
            ctx.add_table(list(ws.iter_rows(values_only=True)), title_as_heading=True, sheet=ws.title, page=number)
    finally:
        wb.close()


def load_xls(ctx: Ctx) -> None:
    check_encrypted_office(ctx, "Excel 表格")
    try:
        book = xlrd.open_workbook(str(ctx.path), on_demand=True)
    except xlrd.biffh.XLRDError as e:
        raise LoadError("corrupt", f"Excel 表格「{ctx.name}」无法打开（{e}）：请用 Excel 打开并另存为 .xlsx "
                                   "后重新导入") from e
    try:
        for number in range(book.nsheets):
            sheet = book.sheet_by_index(number)
            rows = [[_xls_cell(book, c) for c in sheet.row(r)] for r in range(sheet.nrows)]
            ctx.add_table(rows, title_as_heading=True, sheet=sheet.name, page=number + 1)
            book.unload_sheet(number)
    finally:
        book.release_resources()


def _xls_cell(book: xlrd.Book, cell: xlrd.sheet.Cell):
    if cell.ctype == xlrd.XL_CELL_DATE:
        try:
            return xlrd.xldate_as_datetime(cell.value, book.datemode)
        except (ValueError, OverflowError):
            return cell.value
    if cell.ctype == xlrd.XL_CELL_BOOLEAN:
        return bool(cell.value)
    if cell.ctype == xlrd.XL_CELL_ERROR:
        return ""
    return cell.value
