/**
 * Discord-style permission bitfield and the one function that computes what a user may do in a
 * channel. Every resolver, and every delivered event, asks `computeChannelPermissions` (through
 * `loadChannelAccess` in services/access.service.ts).
 */
export const Permission = {
  VIEW_CHANNEL: 1n << 0n,
  SEND_MESSAGES: 1n << 1n,
  READ_HISTORY: 1n << 2n,
  MANAGE_MESSAGES: 1n << 3n,
  MANAGE_CHANNELS: 1n << 4n,
  MANAGE_ROLES: 1n << 5n,
  MANAGE_GUILD: 1n << 6n,
  KICK_MEMBERS: 1n << 7n,
  BAN_MEMBERS: 1n << 8n,
  CREATE_INVITE: 1n << 9n,
  MENTION_EVERYONE: 1n << 10n,
  ADD_REACTIONS: 1n << 11n,
  ATTACH_FILES: 1n << 12n,
  PIN_MESSAGES: 1n << 13n,
  VIEW_AUDIT_LOG: 1n << 14n,
  CONNECT: 1n << 15n,
  SPEAK: 1n << 16n,
  MUTE_MEMBERS: 1n << 17n,
  MOVE_MEMBERS: 1n << 18n,
  ADMINISTRATOR: 1n << 19n,
  /** time out members */
  MODERATE_MEMBERS: 1n << 20n,
  CREATE_THREADS: 1n << 21n,
  CHANGE_NICKNAME: 1n << 22n,
  MANAGE_NICKNAMES: 1n << 23n,
} as const;
export type PermissionName = keyof typeof Permission;
export const PERMISSION_NAMES = Object.keys(Permission) as PermissionName[];
export const ALL_PERMISSIONS = Object.values(Permission).reduce((a, b) => a | b, 0n);

/** What @everyone may do in a new guild. */
export const DEFAULT_EVERYONE =
  Permission.VIEW_CHANNEL |
  Permission.SEND_MESSAGES |
  Permission.READ_HISTORY |
  Permission.CREATE_INVITE |
  Permission.ADD_REACTIONS |
  Permission.ATTACH_FILES |
  Permission.CONNECT |
  Permission.SPEAK |
  Permission.CREATE_THREADS |
  Permission.CHANGE_NICKNAME;

/** What each recipient of a DM or group DM may do there. */
export const DM_PERMISSIONS =
  Permission.VIEW_CHANNEL |
  Permission.SEND_MESSAGES |
  Permission.READ_HISTORY |
  Permission.ADD_REACTIONS |
  Permission.ATTACH_FILES |
  Permission.PIN_MESSAGES |
  Permission.CONNECT |
  Permission.SPEAK;

/** A timed-out member keeps only these (they can still read). */
const TIMEOUT_ALLOWED = Permission.VIEW_CHANNEL | Permission.READ_HISTORY;

export const has = (perms: bigint, flag: bigint) => (perms & flag) === flag;

export function permissionNames(perms: bigint): PermissionName[] {
  return PERMISSION_NAMES.filter((n) => has(perms, Permission[n]));
}

export function permissionsFromNames(names: readonly string[]): bigint {
  let p = 0n;
  for (const n of names) {
    const flag = Permission[n as PermissionName];
    if (flag === undefined) throw new Error(`Unknown permission ${n}`);
    p |= flag;
  }
  return p;
}

export interface RoleInfo {
  id: string;
  permissions: bigint;
  position: number;
  isEveryone: boolean;
}
export interface OverwriteInfo {
  targetType: 'ROLE' | 'MEMBER';
  targetId: string;
  allow: bigint;
  deny: bigint;
}
/**
 * Overwrite levels as a log row's payload keeps them (JSON has no bigint): what visibility needs
 * to decide on an event about a channel whose overwrites are gone (a CHANNEL_DELETED).
 */
export type StoredOverwriteLevels = { t: 'ROLE' | 'MEMBER'; id: string; a: string; d: string }[][];

export function storeOverwriteLevels(levels: readonly (readonly OverwriteInfo[])[]): StoredOverwriteLevels {
  return levels.map((level) =>
    level.map((o) => ({ t: o.targetType, id: o.targetId, a: o.allow.toString(), d: o.deny.toString() })),
  );
}

/** storeOverwriteLevels read back; null when `stored` is not what it writes. */
export function readOverwriteLevels(stored: unknown): OverwriteInfo[][] | null {
  if (!Array.isArray(stored)) return null;
  const out: OverwriteInfo[][] = [];
  for (const level of stored) {
    if (!Array.isArray(level)) return null;
    const list: OverwriteInfo[] = [];
    for (const o of level) {
      if (typeof o !== 'object' || o === null) return null;
      const { t, id, a, d } = o as Record<string, unknown>;
      if ((t !== 'ROLE' && t !== 'MEMBER') || typeof id !== 'string') return null;
      if (typeof a !== 'string' || typeof d !== 'string' || !/^\d+$/.test(a) || !/^\d+$/.test(d)) return null;
      list.push({ targetType: t, targetId: id, allow: BigInt(a), deny: BigInt(d) });
    }
    out.push(list);
  }
  return out;
}

export interface GuildPermissionInput {
  userId: string;
  ownerId: string;
  isMember: boolean;
  /** @everyone plus the member's roles */
  roles: RoleInfo[];
  timeoutUntil: Date | null;
  now: Date;
}

/** A member's roles' permissions together: the owner and ADMINISTRATOR have all. */
function rolePermissions(i: GuildPermissionInput): bigint {
  if (i.userId === i.ownerId) return ALL_PERMISSIONS;
  let p = 0n;
  for (const r of i.roles) p |= r.permissions;
  return has(p, Permission.ADMINISTRATOR) ? ALL_PERMISSIONS : p;
}

const timedOut = (i: GuildPermissionInput) => !!i.timeoutUntil && i.timeoutUntil > i.now;

/**
 * Guild-level permissions: owner has all; ADMINISTRATOR has all; otherwise the union of roles,
 * less what a timeout takes.
 */
export function computeGuildPermissions(i: GuildPermissionInput): bigint {
  if (!i.isMember) return 0n;
  const p = rolePermissions(i);
  if (p === ALL_PERMISSIONS) return p;
  return timedOut(i) ? p & TIMEOUT_ALLOWED : p;
}

/**
 * Channel permissions: the member's roles' permissions, then each level of overwrites from the
 * outermost (category) to the channel itself; at each level @everyone's overwrite, then the union
 * of the member's role overwrites, then the member's own; then what a timeout takes, as Discord
 * does. A timeout keeps what the overwrites show (it stops sending, not reading), and a member
 * whose roles give nothing in the guild still sees a channel an overwrite opens to it. Without
 * VIEW_CHANNEL nothing else applies.
 */
export function computeChannelPermissions(
  i: GuildPermissionInput,
  /** overwrite lists, outermost first */
  levels: readonly (readonly OverwriteInfo[])[],
): bigint {
  if (!i.isMember) return 0n;
  let p = rolePermissions(i);
  if (p === ALL_PERMISSIONS) return p;
  const everyone = i.roles.find((r) => r.isEveryone);
  const roleIds = new Set(i.roles.filter((r) => !r.isEveryone).map((r) => r.id));
  for (const level of levels) {
    const ev = everyone && level.find((o) => o.targetType === 'ROLE' && o.targetId === everyone.id);
    if (ev) p = (p & ~ev.deny) | ev.allow;
    let allow = 0n;
    let deny = 0n;
    for (const o of level) {
      if (o.targetType === 'ROLE' && roleIds.has(o.targetId)) {
        allow |= o.allow;
        deny |= o.deny;
      }
    }
    p = (p & ~deny) | allow;
    const own = level.find((o) => o.targetType === 'MEMBER' && o.targetId === i.userId);
    if (own) p = (p & ~own.deny) | own.allow;
  }
  if (timedOut(i)) p &= TIMEOUT_ALLOWED;
  if (!has(p, Permission.VIEW_CHANNEL)) return 0n;
  return p;
}

/** The highest role position a member holds (the owner outranks everyone). */
export function highestPosition(i: { userId: string; ownerId: string; roles: RoleInfo[] }): number {
  if (i.userId === i.ownerId) return Number.POSITIVE_INFINITY;
  return Math.max(0, ...i.roles.map((r) => r.position));
}
