/**
 * A row as `row_to_json` gives it (column names, dates and arrays in JSON) in the shape drizzle
 * selects it, each value decoded by its own column: one statement can then return rows of
 * several tables without a select per table.
 */
import { getTableColumns, type InferSelectModel, type Table } from 'drizzle-orm';

export function fromRowJson<T extends Table>(table: T, json: Record<string, unknown>): InferSelectModel<T> {
  const out: Record<string, unknown> = {};
  for (const [key, column] of Object.entries(getTableColumns(table))) {
    const v = json[column.name];
    out[key] = v === null || v === undefined ? null : column.mapFromDriverValue(v);
  }
  return out as InferSelectModel<T>;
}
