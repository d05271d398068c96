-- SPIRE datastore schema 24 on PostgreSQL (lib/pq), as a fresh initDB creates it (SPIRE 1.14.3 - 1.14.7).
-- GORM v1.9.16 AutoMigrate of SPIRE's models, in initDB's order: the join table is created
-- while GORM walks Bundle's fields, so it comes first; each table is followed by its indexes;
-- idx_federated_registration_entries_registered_entry_id is added by hand at the end.
-- Statement text follows GORM's own (quoting, spacing). The migrations row is NOT inserted
-- here: the testkit writes it, so code_version can vary. See spire-reference.md sections 2 and 3.
CREATE TABLE "federated_registration_entries" ("bundle_id" integer,"registered_entry_id" integer, PRIMARY KEY ("bundle_id","registered_entry_id"));
CREATE TABLE "bundles" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"trust_domain" text NOT NULL,"data" bytea , PRIMARY KEY ("id"));
CREATE UNIQUE INDEX uix_bundles_trust_domain ON "bundles"(trust_domain) ;
CREATE TABLE "attested_node_entries" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"spiffe_id" text,"data_type" text,"serial_number" text,"expires_at" timestamp with time zone,"new_serial_number" text,"new_expires_at" timestamp with time zone,"can_reattest" boolean,"agent_version" text , PRIMARY KEY ("id"));
CREATE INDEX idx_attested_node_entries_expires_at ON "attested_node_entries"(expires_at) ;
CREATE UNIQUE INDEX uix_attested_node_entries_spiffe_id ON "attested_node_entries"(spiffe_id) ;
CREATE TABLE "attested_node_entries_events" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"spiffe_id" text , PRIMARY KEY ("id"));
CREATE TABLE "node_resolver_map_entries" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"spiffe_id" text,"type" text,"value" text , PRIMARY KEY ("id"));
CREATE UNIQUE INDEX idx_node_resolver_map ON "node_resolver_map_entries"(spiffe_id, "type", "value") ;
CREATE TABLE "registered_entries" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"entry_id" text,"spiffe_id" text,"parent_id" text,"ttl" integer,"admin" boolean,"downstream" boolean,"expiry" bigint,"revision_number" bigint,"store_svid" boolean,"hint" text,"jwt_svid_ttl" integer , PRIMARY KEY ("id"));
CREATE INDEX idx_registered_entries_spiffe_id ON "registered_entries"(spiffe_id) ;
CREATE INDEX idx_registered_entries_parent_id ON "registered_entries"(parent_id) ;
CREATE INDEX idx_registered_entries_expiry ON "registered_entries"("expiry") ;
CREATE INDEX idx_registered_entries_hint ON "registered_entries"("hint") ;
CREATE UNIQUE INDEX uix_registered_entries_entry_id ON "registered_entries"(entry_id) ;
CREATE TABLE "registered_entries_events" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"entry_id" text , PRIMARY KEY ("id"));
CREATE TABLE "join_tokens" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"token" text,"expiry" bigint , PRIMARY KEY ("id"));
CREATE UNIQUE INDEX uix_join_tokens_token ON "join_tokens"("token") ;
CREATE TABLE "selectors" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"registered_entry_id" integer,"type" text,"value" text , PRIMARY KEY ("id"));
CREATE INDEX idx_selectors_type_value ON "selectors"("type", "value") ;
CREATE UNIQUE INDEX idx_selector_entry ON "selectors"(registered_entry_id, "type", "value") ;
CREATE TABLE "migrations" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"version" integer,"code_version" text , PRIMARY KEY ("id"));
CREATE TABLE "dns_names" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"registered_entry_id" integer,"value" text , PRIMARY KEY ("id"));
CREATE UNIQUE INDEX idx_dns_entry ON "dns_names"(registered_entry_id, "value") ;
CREATE TABLE "federated_trust_domains" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"trust_domain" text NOT NULL,"bundle_endpoint_url" text,"bundle_endpoint_profile" text,"endpoint_spiffe_id" text,"implicit" boolean , PRIMARY KEY ("id"));
CREATE UNIQUE INDEX uix_federated_trust_domains_trust_domain ON "federated_trust_domains"(trust_domain) ;
CREATE TABLE "ca_journals" ("id" serial,"created_at" timestamp with time zone,"updated_at" timestamp with time zone,"data" bytea,"active_x509_authority_id" text,"active_jwt_authority_id" text , PRIMARY KEY ("id"));
CREATE INDEX idx_ca_journals_active_x509_authority_id ON "ca_journals"(active_x509_authority_id) ;
CREATE INDEX idx_ca_journals_active_jwt_authority_id ON "ca_journals"(active_jwt_authority_id) ;
CREATE INDEX idx_federated_registration_entries_registered_entry_id ON "federated_registration_entries"(registered_entry_id) ;
