import type { IncomingMessage } from 'node:http';

/**
 * The address a request came from, for per-IP limits and logs: the socket's peer, or, with
 * `hops` (TRUST_PROXY_HOPS) proxies of yours in front, the address the outermost of them got the
 * request from. Each proxy appends its own peer to X-Forwarded-For, so the header is read from
 * the right, `hops` entries deep; anything further left was written by the client and may be
 * forged. A header shorter than that gives its leftmost entry; none at all, the peer.
 */
export function clientIp(req: IncomingMessage, hops: number): string {
  const peer = req.socket.remoteAddress ?? 'unknown';
  if (hops <= 0) return peer;
  const raw = req.headers['x-forwarded-for'];
  const header = Array.isArray(raw) ? raw.join(',') : (raw ?? '');
  const list = header
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (!list.length) return peer;
  return list[Math.max(0, list.length - hops)];
}
