CREATE TABLE "former_members" (
	"guild_id" uuid NOT NULL,
	"user_id" uuid NOT NULL,
	"deleted_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "former_members_guild_id_user_id_pk" PRIMARY KEY("guild_id","user_id")
);
--> statement-breakpoint
ALTER TABLE "former_members" ADD CONSTRAINT "former_members_user_id_users_id_fk" FOREIGN KEY ("user_id") REFERENCES "public"."users"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "former_members_user" ON "former_members" USING btree ("user_id");--> statement-breakpoint
CREATE INDEX "former_members_deleted" ON "former_members" USING btree ("deleted_at");--> statement-breakpoint
-- GUILD_DELETED rows written before this table carried their members in the payload: move them here.
INSERT INTO "former_members" ("guild_id", "user_id", "deleted_at")
SELECT DISTINCT ON (e."guild_id", m."user_id") e."guild_id", m."user_id"::uuid, e."created_at"
FROM "events" e
CROSS JOIN LATERAL jsonb_array_elements_text(e."payload"->'memberIds') AS m("user_id")
JOIN "users" u ON u."id" = m."user_id"::uuid
WHERE e."type" = 'GUILD_DELETED' AND e."guild_id" IS NOT NULL AND jsonb_typeof(e."payload"->'memberIds') = 'array'
ON CONFLICT DO NOTHING;--> statement-breakpoint
UPDATE "events" SET "payload" = "payload" - 'memberIds' WHERE "type" = 'GUILD_DELETED' AND "payload" ? 'memberIds';
