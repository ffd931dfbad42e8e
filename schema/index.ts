/** Imports every type file (each adds itself to the builder), then builds the schema. */
import { builder } from './builder.ts';
import './server-info.ts';
import './user.ts';
import './relationship.ts';
import './guild.ts';
import './channel.ts';
import './direct.ts';
import './member.ts';
import './role.ts';
import './invite.ts';
import './moderation.ts';
import './report.ts';
import './message.ts';
import './reaction.ts';
import './pin.ts';
import './read-state.ts';
import './search.ts';
import './events.ts';
import './node.ts';

let built: ReturnType<typeof builder.toSchema> | undefined;

/** The schema is built once per process: building is pure, and Pothos refuses to build twice. */
export function buildSchema() {
  built ??= builder.toSchema({ sortSchema: true });
  return built;
}
