import { ConfigError, loadConfig } from './config.ts';

let config: ReturnType<typeof loadConfig>;
try {
  config = loadConfig();
} catch (err) {
  if (err instanceof ConfigError) {
    console.error(`banter: configuration error: ${err.message}`);
    process.exit(1);
  }
  throw err;
}

// The app and all it loads (GraphQL, the database driver, ~2 s of CPU) only once the configuration
// is known good: a bad value is told at once.
const { buildApp } = await import('./app.ts');
const app = await buildApp(config);
const port = await app.start();
app.log.info(`GraphQL at http://localhost:${port}/graphql`);

let stopping = false;
for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.on(signal, () => {
    if (stopping) return;
    stopping = true;
    app.log.info({ signal }, 'shutting down');
    app.stop().then(
      () => process.exit(0),
      (err) => {
        app.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  });
}
