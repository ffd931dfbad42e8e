import { builder } from './builder.ts';

const ServerInfo = builder.objectRef<{ name: string; version: string; motd: string; features: string[] }>(
  'ServerInfo',
);
ServerInfo.implement({
  fields: (t) => ({
    name: t.exposeString('name'),
    version: t.exposeString('version'),
    motd: t.exposeString('motd'),
    features: t.exposeStringList('features', { description: 'Enabled features, e.g. "search:postgres"' }),
  }),
});

builder.queryField('serverInfo', (t) =>
  t.field({
    type: ServerInfo,
    resolve: (_r, _a, ctx) => {
      const s = ctx.deps.settings;
      return { name: s.serverName, version: s.version, motd: s.motd, features: s.features };
    },
  }),
);
