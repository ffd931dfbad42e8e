import { setFlagsFromString } from 'node:v8';
import { ConfigError, loadConfig } from './config.ts';

// The heap may grow to twice what a full collection left live before the next one (as Go's
// GOGC=100). V8 chose far less here (a limit of 95 MB for 72 MB live at 1,000 subscribers), and
// starts marking once the room left is under the young generation's size: paced at 10 messages/s,
// a full collection ran every 2-6 s, its pause and marking steps (3-40 ms) in the way of whatever
// message was being fanned out; with this, none in 20 s. A flag given to node itself wins.
if (!process.execArgv.some((a) => a.startsWith('--heap-growing-percent')))
  setFlagsFromString('--heap-growing-percent=100');

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
