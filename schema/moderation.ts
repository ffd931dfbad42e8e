// Placeholder: filled in by the moderation work. Each schema file adds its own types and root fields to the builder.
