import { pino } from 'pino';

export type Logger = pino.Logger;

export function createLogger(level: string): Logger {
  return pino({ level, base: { svc: 'banter-api' }, timestamp: pino.stdTimeFunctions.isoTime });
}
