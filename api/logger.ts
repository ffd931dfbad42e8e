import { pino } from 'pino';
import { requestStore } from './request-store.ts';

export type Logger = pino.Logger;

/**
 * JSON logs on stdout (or `destination`, which tests use to read them back). Every line logged
 * inside a request's async call tree carries its `requestId`, whoever logs it.
 */
export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { svc: 'banter-api' },
      timestamp: pino.stdTimeFunctions.isoTime,
      mixin() {
        const store = requestStore.getStore();
        return store ? { requestId: store.requestId } : {};
      },
    },
    destination,
  );
}
