/** Imports every type file (each adds itself to the builder), then builds the schema. */
import { isObjectType } from 'graphql';
import { builder, encodeId, nodeIdResolvers } from './builder.ts';
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
  if (!built) {
    built = builder.toSchema({ sortSchema: true });
    syncNodeIds(built);
  }
  return built;
}

/** Every Node type's `id` resolves synchronously, to what Pothos's encodeGlobalID would give. */
function syncNodeIds(schema: NonNullable<typeof built>) {
  for (const type of Object.values(schema.getTypeMap())) {
    if (!isObjectType(type) || !type.getInterfaces().some((i) => i.name === 'Node')) continue;
    const raw = nodeIdResolvers.get(type.name);
    if (!raw) throw new Error(`Node type ${type.name} has no nodeId() in its ref`);
    const name = type.name;
    type.getFields().id.resolve = (parent) => encodeId(name, String(raw(parent as never)));
  }
}
