import { createDatabase } from '../core/db/client.ts';
import { ConfigError, loadConfig } from './config.ts';

try {
  const config = loadConfig();
  const db = await createDatabase({ url: config.databaseUrl, dataDir: config.dataDir });
  await db.migrate();
  await db.close();
  console.log(`banter: migrations applied (${db.kind})`);
} catch (err) {
  if (err instanceof ConfigError) {
    console.error(`banter: configuration error: ${err.message}`);
    process.exit(1);
  }
  throw err;
}
