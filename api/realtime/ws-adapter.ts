/**
 * A thin graphql-ws adapter for `ws` (in place of graphql-ws/use/ws), shaped for fan-out:
 * - `send` does not wait for each frame to be flushed: a subscriber's next event goes out while
 *   the previous one is still in the kernel, and the bound on `bufferedAmount` is what holds a
 *   slow consumer back (it is closed with SlowConsumer and resumes by cursor);
 * - one keep-alive timer for all sockets instead of one interval and timeout per socket: a
 *   socket that has not answered the previous ping by the next one is terminated.
 */
import type { IncomingMessage } from 'node:http';
import { handleProtocols, makeServer, type ServerOptions } from 'graphql-ws';
import type { WebSocket, WebSocketServer } from 'ws';
import { CloseCode } from '../../core/realtime/disconnect.ts';

export interface AdapterOptions {
  keepAliveMs: number;
  maxBufferedBytes: number;
  onSlowConsumer?(socket: WebSocket): void;
}

const alive = new WeakMap<WebSocket, boolean>();

export function useFanoutServer<E extends { socket: WebSocket; request: IncomingMessage }>(
  options: ServerOptions<Record<string, unknown>, E>,
  wss: WebSocketServer,
  o: AdapterOptions,
) {
  const server = makeServer(options);
  wss.options.handleProtocols = handleProtocols;

  const timer = setInterval(() => {
    for (const s of wss.clients) {
      if (alive.get(s) === false) {
        s.terminate();
        continue;
      }
      alive.set(s, false);
      if (s.readyState === s.OPEN) s.ping();
    }
  }, o.keepAliveMs);
  timer.unref();

  wss.on('connection', (socket: WebSocket, request: IncomingMessage) => {
    alive.set(socket, true);
    socket.on('pong', () => alive.set(socket, true));
    socket.once('error', () => socket.terminate());
    const closed = server.opened(
      {
        protocol: socket.protocol,
        send(data) {
          if (socket.readyState !== socket.OPEN) return;
          if (socket.bufferedAmount > o.maxBufferedBytes) {
            o.onSlowConsumer?.(socket);
            socket.close(CloseCode.SlowConsumer, 'Slow consumer: resume from your last cursor');
            return;
          }
          socket.send(data);
        },
        close: (code, reason) => socket.close(code, reason),
        onMessage: (cb) =>
          socket.on('message', async (event) => {
            try {
              await cb(String(event));
            } catch {
              socket.close(4500, 'Internal server error');
            }
          }),
      },
      { socket, request } as E,
    );
    socket.once('close', (code, reason) => closed(code, String(reason)));
  });

  return {
    async dispose() {
      clearInterval(timer);
      for (const s of wss.clients) s.close(1001, 'Going away');
    },
  };
}
