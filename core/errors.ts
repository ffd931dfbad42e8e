/**
 * Errors a client can act on. Each carries one of the codes in CONTRACT.md; the API layer turns
 * them into GraphQL errors with `extensions.code`. Anything else that escapes is masked.
 */
export const ErrorCode = {
  UNAUTHENTICATED: 'UNAUTHENTICATED',
  FORBIDDEN: 'FORBIDDEN',
  NOT_FOUND: 'NOT_FOUND',
  BAD_USER_INPUT: 'BAD_USER_INPUT',
  RATE_LIMITED: 'RATE_LIMITED',
  CONFLICT: 'CONFLICT',
  CURSOR_EXPIRED: 'CURSOR_EXPIRED',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** The one place each code gets a default message a person can read. */
const defaultMessages: Record<ErrorCode, string> = {
  UNAUTHENTICATED: 'You need to sign in to do this.',
  FORBIDDEN: 'You do not have permission to do this.',
  NOT_FOUND: 'Not found.',
  BAD_USER_INPUT: 'The input is not valid.',
  RATE_LIMITED: 'Too many requests; try again later.',
  CONFLICT: 'This conflicts with the current state.',
  CURSOR_EXPIRED: 'The cursor is past retention; refetch and start fresh.',
};

export class BanterError extends Error {
  readonly code: ErrorCode;
  readonly extra: Record<string, unknown>;
  constructor(
    code: ErrorCode,
    message?: string,
    options?: { cause?: unknown; extra?: Record<string, unknown> },
  ) {
    super(message ?? defaultMessages[code], { cause: options?.cause });
    this.name = 'BanterError';
    this.code = code;
    this.extra = options?.extra ?? {};
  }
}

export const unauthenticated = (message?: string) => new BanterError('UNAUTHENTICATED', message);
export const forbidden = (message?: string) => new BanterError('FORBIDDEN', message);
export const notFound = (what = 'Resource') => new BanterError('NOT_FOUND', `${what} not found.`);
export const badInput = (message: string, field?: string) =>
  new BanterError('BAD_USER_INPUT', message, field ? { extra: { field } } : undefined);
export const conflict = (message: string) => new BanterError('CONFLICT', message);
export const rateLimited = (retryAfter: number, message?: string) =>
  new BanterError('RATE_LIMITED', message ?? `Too many requests; retry in ${retryAfter} s.`, {
    extra: { retryAfter },
  });
