CREATE INDEX "bans_user" ON "bans" USING btree ("user_id");--> statement-breakpoint
CREATE INDEX "invites_channel" ON "invites" USING btree ("channel_id");--> statement-breakpoint
CREATE INDEX "read_states_channel" ON "read_states" USING btree ("channel_id","user_id");--> statement-breakpoint
CREATE INDEX "spent_refresh_tokens_session" ON "spent_refresh_tokens" USING btree ("session_id");