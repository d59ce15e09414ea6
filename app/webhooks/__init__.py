"""Providers' receipts: Twilio's status callbacks and Meta's WhatsApp webhooks, authenticated by their signatures."""
