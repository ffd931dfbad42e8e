ALTER TABLE "reports" DROP CONSTRAINT "reports_message_id_messages_id_fk";
