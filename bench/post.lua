-- The request every bench target receives: a 212-byte JSON deposit, the body size the
-- throughput anchors were measured with. bench/run.py reads wrk.body from this file for its
-- own smoke check, so keep it on one line in single quotes.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"amount":12500,"currency":"EUR","customer":"cus_9f8e7d6c5b4a","payment_method":"pm_card_visa","description":"Wallet deposit","metadata":{"order_id":"ord_20261125_000123","channel":"web"},"reference":"dep_01234"}'
