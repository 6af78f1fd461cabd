"""Kafka: the event sink (transactions and gateway events out), the control-topic consumer
(back-office commands in) and `payswitch tail`. aiokafka is imported only here."""
