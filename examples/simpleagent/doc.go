// Package simpleagent is the Go version of Nanite's README walkthrough: the
// agent in ./agent hosts the actor "simple", the requester in ./requester
// embeds a mapper and calls it. See README.md for how to run them; the test
// in this directory builds both programs and runs them against a private
// RabbitMQ node.
package simpleagent
